// The sampler of llama2.c's run.c (commit 350e04fe), verbatim in its logic, as a
// test oracle. Reads lines "seed temperature topp n logit_0 ... logit_{n-1}" on
// stdin and prints the sampled index for each line.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct { float prob; int index; } ProbIndex;

static unsigned int random_u32(unsigned long long *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (*state * 0x2545F4914F6CDD1Dull) >> 32;
}
static float random_f32(unsigned long long *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static void softmax(float* x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; i++) if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < size; i++) { x[i] = expf(x[i] - max_val); sum += x[i]; }
    for (int i = 0; i < size; i++) x[i] /= sum;
}
static int sample_argmax(float* probabilities, int n) {
    int max_i = 0; float max_p = probabilities[0];
    for (int i = 1; i < n; i++) if (probabilities[i] > max_p) { max_i = i; max_p = probabilities[i]; }
    return max_i;
}
static int sample_mult(float* probabilities, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) { cdf += probabilities[i]; if (coin < cdf) return i; }
    return n - 1;
}
static int compare(const void* a, const void* b) {
    ProbIndex* a_ = (ProbIndex*) a; ProbIndex* b_ = (ProbIndex*) b;
    if (a_->prob > b_->prob) return -1;
    if (a_->prob < b_->prob) return 1;
    return 0;
}
static int sample_topp(float* probabilities, int n, float topp, ProbIndex* probindex, float coin) {
    int n0 = 0;
    const float cutoff = (1.0f - topp) / (n - 1);
    for (int i = 0; i < n; i++) {
        if (probabilities[i] >= cutoff) { probindex[n0].index = i; probindex[n0].prob = probabilities[i]; n0++; }
    }
    qsort(probindex, n0, sizeof(ProbIndex), compare);
    float cumulative_prob = 0.0f; int last_idx = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cumulative_prob += probindex[i].prob;
        if (cumulative_prob > topp) { last_idx = i; break; }
    }
    float r = coin * cumulative_prob; float cdf = 0.0f;
    for (int i = 0; i <= last_idx; i++) { cdf += probindex[i].prob; if (r < cdf) return probindex[i].index; }
    return probindex[last_idx].index;
}

int main(void) {
    unsigned long long seed; float temperature, topp; int n;
    while (scanf("%llu %f %f %d", &seed, &temperature, &topp, &n) == 4) {
        float* logits = malloc(n * sizeof(float));
        ProbIndex* probindex = malloc(n * sizeof(ProbIndex));
        for (int i = 0; i < n; i++) if (scanf("%a", &logits[i]) != 1) return 1;
        unsigned long long state = seed; int next;
        // three draws per line so the generator's state advances as in a run
        for (int draw = 0; draw < 3; draw++) {
            float* work = malloc(n * sizeof(float));
            for (int i = 0; i < n; i++) work[i] = logits[i];
            if (temperature == 0.0f) { next = sample_argmax(work, n); }
            else {
                for (int q = 0; q < n; q++) work[q] /= temperature;
                softmax(work, n);
                float coin = random_f32(&state);
                if (topp <= 0 || topp >= 1) next = sample_mult(work, n, coin);
                else next = sample_topp(work, n, topp, probindex, coin);
            }
            printf("%d%c", next, draw == 2 ? '\n' : ' ');
            free(work);
        }
        free(logits); free(probindex);
    }
    return 0;
}
